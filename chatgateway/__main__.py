from chatgateway.cli import main

raise SystemExit(main())
