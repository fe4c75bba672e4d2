"""`python -m finetune_cli` is `finetune`."""

from finetune_cli.main import main

raise SystemExit(main())
