"""Training stages: DAPT (dapt.py), SFT (sft.py), DPO (dpo.py); what they share lives in common.py."""
