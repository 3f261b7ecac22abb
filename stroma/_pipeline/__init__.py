"""How a pipeline is run, around the step loop (private; the public face is :mod:`stroma.runner`).

- :mod:`~stroma._pipeline.plan`: marked step functions, parallel stages and the validated run plan;
- :mod:`~stroma._pipeline.parallel`: running a parallel stage and merging its outputs;
- :mod:`~stroma._pipeline.resume`: run manifests, resuming a run id, keeping a finished result.

Each step itself runs through :func:`stroma.middleware.execute_step`.
"""
