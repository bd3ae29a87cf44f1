"""The Label Studio side of label-studio-sahi: labeling-config templates and project wiring.

It talks to Label Studio's REST API and the backend's HTTP API only; it imports nothing
from ``backend`` (and ``backend`` nothing from it), so it can run from any machine.
"""
