"""Console-script mains: each command only parses its flags and calls the library.

``apr-train`` = ``python -m apr.commands.train``, ``apr-eval`` = ``python -m apr.commands.evaluate``;
the repository's ``train_imagenet.py`` / ``eval_imagenet_c.py`` are aliases of these. ``apr-ood``,
``apr-attack``, ``apr-report``, ``apr-analysis``, ``apr-corrupt`` and ``apr-layout`` wrap the
``python -m`` mains of apr.ood, apr.adversarial, apr.report, apr.analysis, apr.corrupt and
apr.data.layout in ``apr.cli.run_main`` (both spellings keep working: the study runner uses ``-m``).
"""
