from nmi.cli import main

main()
