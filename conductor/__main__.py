from conductor.cli.main import main

raise SystemExit(main())
