from downloader.cli import main

main()
