"""The "sd" generator (paper 4.2-4.3) as a package, one job per module:

- model.py: `SDModel`, one SD 1.x-format folder (load, save, encode, one UNet pass), the tiny default;
- generator.py: the `sd` generator stage (DDIM + classifier-free guidance, retries, settings);
- sampling.py: layout initialization (4.3) and semantic guidance (Eq. 4-6);
- au_adapter.py: the AU adapter (4.2.2) on diffusers' IP-Adapter machinery;
- training.py: `synfer train generator | au-adapter | vae` on FEText (mmengine).

Registering imports the stage module only, which imports no torch: `synfer --help`,
`synfer plugins` and `synfer validate` stay torch-free.
"""
from synfer import hookimpl


@hookimpl
def register_stages(register):
    from synfer_plugins.sd.generator import SDGenerator

    register(SDGenerator)


@hookimpl
def register_commands(cli):
    from synfer_plugins.sd.commands import add_commands

    add_commands(cli.subgroup("train"))
