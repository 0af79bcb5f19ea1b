from fastca.cli.main import main

main()
