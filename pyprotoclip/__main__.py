from pyprotoclip.cli import main

main()
