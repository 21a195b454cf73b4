"""The `synfer` command line, synfer's top floor: one module per command group. The only part of the core that
imports click; it imports the engine and the contract, never the other way."""
