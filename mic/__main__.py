from mic.cli import main

main()
