"""A task's image URL in, checked RGB pixels out: fetching (``fetch``), where a fetch may go
(``egress``), and the structure checks every file passes before a native decoder sees it
(``checks``)."""
