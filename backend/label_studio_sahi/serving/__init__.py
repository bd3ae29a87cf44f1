"""The HTTP server: routes (``routes``), a process's state and hot swap (``state``,
``hot_swap``), the prediction pipeline (``pipeline``), who and what may call it (``auth``,
``browser_guard``, ``admission``, ``http_limits``), and the curators' page (``page``,
``page_images``)."""
