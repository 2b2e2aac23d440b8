"""modelconsole.server: the HTTP face of one engine — KServe V2, the control API, events, metrics.

See app.py for the routes and the guard every request passes, body.py and connections.py for the
limits on what a client may send, tokenfile.py for the control token.
"""
