from convserve.cli import main

raise SystemExit(main())
