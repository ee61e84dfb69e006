"""The `kubetune` command line and the local mode (`kubetune run`, `kubetune demo`).

The one package that imports both sides: the FineTuneJob API and builders of `kubetune_operator`, and the
trainer's contract and config of `kubetune_trainer` (torch only inside `kubetune demo`, which needs the
`local` and `trainer` extras).
"""
