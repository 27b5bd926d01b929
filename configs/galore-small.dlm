---
# galore-small.dlm: GaLore on a 135M base, written to show what the doctor says about it.
# dlm doctor configs/galore-small.dlm -> warn=galore-small-base(135M<1B), info galore-with-adapter
dlm_id: 01KAV3JC2D3E4F5G6H7J8K9M0N
dlm_version: 1
base_model: smollm2-135m        # 135M parameters: far below the 7B where GaLore's memory gains start
training:
  adapter: lora                 # GaLore projects the gradients of the adapter's own linear layers
  lora_r: 8
  lora_alpha: 16                # scale = 16 / 8 = 2
  target_modules: auto          # q_proj, k_proj, v_proj, o_proj
  optimizer: galore_adamw       # gradient low-rank projection, then AdamW
  galore_rank: 4                # projection rank, below lora_r (8) or nothing is projected; auto (unset) picks 4 too
  galore_update_proj_gap: 50    # recompute the projection every 50 optimizer steps
  galore_scale: 0.25            # scale of the projected update
  learning_rate: 2.0e-4
  max_steps: 30                 # 5 prose sections (one example each, one held out); 30 optimizer steps
  sequence_len: 512
  eval_fraction: 0.2            # 1 of the 5 sections held out
  seed: 7
---
# Notes on low-rank methods

## LoRA

LoRA freezes the base weights and learns a low-rank update B times A for chosen linear layers; only the
small matrices and their optimizer state are trained, so memory follows the adapter, not the base.

## DoRA

DoRA splits each adapted weight into a magnitude vector and a direction: the direction gets the LoRA
update and is normalised column by column, and the magnitude is learned on its own.

## GaLore

GaLore keeps full-rank weights but projects each gradient onto a low-rank subspace before the optimizer
sees it, so the optimizer state shrinks; the projection is refreshed every few hundred steps.

## GaLore on small bases

On a small base the optimizer state is already small, and with an adapter it is tiny: GaLore then adds
projection work and saves almost nothing.

## QLoRA

QLoRA loads the frozen base in 4-bit NF4 and trains a LoRA adapter on top, trading step time for memory.
