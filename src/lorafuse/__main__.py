from lorafuse.cli import main

main()
