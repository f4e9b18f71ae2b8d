from sae_training.cli import main

main()
