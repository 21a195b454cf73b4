"""The run engine, synfer's middle floor: the plugin registry, recipes, the pipeline that generates, labels and
writes a dataset, resume, locks, seeds, training loops, evaluation. Imports only `synfer.contract`."""
