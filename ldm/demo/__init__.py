"""`ldm demo`: a Gradio web page for a saved model, and the files that let it run as a Hugging Face Space.

  app.py      the page: a tab per task the model can do (Generate, Edit, Upscale)
  serving.py  what a folder can do, loading it, running its pipelines for visitors (queue, progress, Stop)
              (app.py and serving.py need only gradio, torch and diffusers: they are copied into model repositories)
  space.py  writes app.py, requirements.txt and the model card's demo section into a model folder (ldm push)
"""
