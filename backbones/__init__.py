"""Built-in injectors for Hugging Face backbones (installed as ``resprune.backbones``)."""
