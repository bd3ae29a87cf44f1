"""Label Studio's side of the contract: label configs and results (``label_config``), the one
REST client (``client``) and its tokens (``tokens``)."""
