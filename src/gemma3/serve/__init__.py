"""`gemma3 serve`: an OpenAI-compatible server, a thin HTTP layer (app.py, request models in protocol.py) over a
scheduler that owns the model and batches every running request (scheduler.py), and a playground page in the
browser with a look inside the model (playground.py, ui/). Optional extra:
pip install 'gemma3[serve]'."""
