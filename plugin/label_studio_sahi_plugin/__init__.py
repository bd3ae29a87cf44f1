"""The Label Studio side of label-studio-sahi: labeling-config templates and project wiring.

It talks to Label Studio's REST API through the backend's one client
(``label_studio_sahi.labelstudio.client``) and to the backend's HTTP API; from the backend it
uses only that client and the stored login. The backend imports nothing from it.
"""
