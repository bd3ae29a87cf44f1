"""What is published and what is live: versions and live pointers (``registry``), and the
models that serve a project (``bundles``)."""
