"""Export: merged HF folder, GGUF, Ollama Modelfile, model card."""
