"""The playground (tools/serve.py): a local web page to talk to a trained model and watch its
router. routing.py traces what the router chose, render.py turns a trace into the page's HTML,
session.py checks requests and streams generations, app.py is the Gradio page around them."""
