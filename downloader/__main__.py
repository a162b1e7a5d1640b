from downloader.launch import main

main()
