"""The plugin contract, synfer's lowest floor: stage classes and their Configs, the value rules the core checks
at the plugin boundary, label spaces, the row format, hook specifications. Imports nothing else of synfer."""
