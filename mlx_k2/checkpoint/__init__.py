"""What a checkpoint is: its config, tensor names, shard headers, inventory and tokenizer; nothing here reads a weight."""
