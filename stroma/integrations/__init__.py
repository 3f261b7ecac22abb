"""Running Stroma pipelines on existing distributed engines.

- :mod:`stroma.integrations.celery`: a pipeline as a Celery task (``pip install 'stroma[celery]'``).

Each integration imports its engine only when the integration module itself is imported; the
core never imports them.
"""
