"""Console-script mains: each command only parses its flags and calls the library.

``apr-train`` = ``python -m apr.commands.train``, ``apr-eval`` = ``python -m apr.commands.evaluate``;
the repository's ``train_imagenet.py`` / ``eval_imagenet_c.py`` are aliases of these.
"""
