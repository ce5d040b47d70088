"""`ldm demo`: a Gradio web page for a saved model, and the files that let it run as a Hugging Face Space.

  app.py    the app itself (tabs per task, queue, progress, stop); self-contained, copied into model repos as app.py
  space.py  writes app.py, requirements.txt and the model card's demo section into a model folder (ldm push)
"""
