from lmrefinery.cli import main

raise SystemExit(main())
