"""synfer's built-in plugins, installed as `synfer_plugins` and registered through the
same `synfer` entry-point group a third-party package uses."""
