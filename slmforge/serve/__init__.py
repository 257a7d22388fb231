"""`slmforge serve`: an OpenAI-compatible server with guided decoding and small-first routing."""
