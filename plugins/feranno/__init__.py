"""FERAnno, the diffusion-feature label calibrator (paper 4.4, Fig. 4), as a package:

- stage.py: the `feranno` calibrator stage and its Config;
- capture.py: decoder features and cross-attention maps captured from one UNet pass at t;
- encoder.py: the dual-branch encoder (torch modules), save/load;
- train.py: `synfer train calibrator` (cached captures, mmengine) and the held-out check.

Registering imports the stage module only, which imports no torch.
"""
from synfer import hookimpl


@hookimpl
def register_stages(register):
    from synfer_plugins.feranno.stage import FERAnno

    register(FERAnno)


@hookimpl
def register_commands(cli):
    from synfer_plugins.feranno.commands import add_commands

    add_commands(cli.subgroup("train"))
