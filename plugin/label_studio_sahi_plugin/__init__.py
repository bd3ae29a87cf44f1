"""The Label Studio side of label-studio-sahi: labeling-config templates and project wiring.

It talks to Label Studio's REST API and the backend's HTTP API only. From ``backend`` it
imports just the token handling (``label_studio_sahi.labelstudio.tokens``: legacy tokens and
personal access tokens); ``backend`` imports nothing from it.
"""
