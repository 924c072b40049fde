"""The ``finetune-helper`` subcommands, one module each (as huggingface/accelerate's ``commands/``): every module has
``add_parser(subparsers)`` and ``run(args)``; ``finetune_helper.cli`` only builds the parser and dispatches.  The
core computes; a command gathers its inputs, calls the core and prints."""
