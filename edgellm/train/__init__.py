"""Fine-tuning: a data file and a base checkpoint in, a LoRA adapter (a PEFT folder) out.

``data`` reads and checks the examples and turns them into token rows with the loss mask;
``model`` loads the base (16-bit, or 4-bit NF4 tensor by tensor) and puts the adapter on it;
``loop`` trains, checkpoints and resumes; ``curve`` draws the loss. torch, transformers and PEFT
are imported only inside these modules' functions, so nothing else pays for them.
"""
