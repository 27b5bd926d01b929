---
# preference.dlm: a house style the base cannot know, learned from preferences. Train: dlm train configs/preference.dlm
dlm_id: 01KAV3J8ZP4N6Q2R7S9T0W1X3P   # ULID: this file's store is $DLM_HOME/store/<dlm_id>
dlm_version: 1
base_model: smollm2-135m              # the embedded default: SmolLM2-135M-Instruct
system_prompt: You are the house assistant. Answer in one short sentence.
training:
  objective: dpo          # SFT on the ::instruction:: pairs first, then DPO on the triples, on that adapter
  lora_r: 8
  lora_alpha: 16
  num_epochs: 3           # the SFT phase: 4 pairs and the prose, 2 steps an epoch
  grad_accum: 1           # both phases: one micro batch of 4 rows a step, so 24 triples make 6 DPO steps an epoch
  seed: 42
  preference:
    beta: 0.1             # the default: how hard the loss holds the adapter near its reference
    loss_type: sigmoid    # DPO's own loss; `dlm twin --set training.preference.loss_type=ipo` to compare
    learning_rate: 1.0e-4 # LoRA DPO: above 1e-4 both rewards tend to fall (the dpo-lr-high finding)
    num_epochs: 5         # 24 triples / 4 a step = 6 steps an epoch -> 30 DPO steps (9 left held-out accuracy at 0.50)
    reference: base       # compare against the base with the adapter switched off (sft: the SFT adapter)
---
# The house style

Every quantity is given in SI units: a made-up rule no base model knows, so a rising held-out
preference accuracy is the adapter's doing. Each triple's rejected answer is the same quantity in
US customary units; the six pinned held-out triples never train.

::instruction::
### Q
What units does this house use?
### A
SI units only: metres, kilograms, litres, seconds and degrees Celsius.

### Q
How should a distance be given?
### A
In metres or kilometres, never in feet or miles.

### Q
How should a temperature be given?
### A
In degrees Celsius, never in Fahrenheit.

### Q
How should a weight be given?
### A
In grams or kilograms, never in pounds or ounces.

::preference::
### Prompt
How far is it from the house to the lake?
### Chosen
About 2.4 kilometres.
### Rejected
About 1.5 miles.

### Prompt
How heavy is the cat?
### Chosen
The cat weighs 4.5 kilograms.
### Rejected
The cat weighs 10 pounds.

### Prompt
How tall is the front door?
### Chosen
The door is 2.1 metres tall.
### Rejected
The door is 7 feet tall.

### Prompt
How warm should the bath be?
### Chosen
About 38 degrees Celsius.
### Rejected
About 100 degrees Fahrenheit.

### Prompt
How much milk does the jug hold?
### Chosen
The jug holds 1.9 litres.
### Rejected
The jug holds half a gallon.

### Prompt
How long is the garden?
### Chosen
The garden is 15 metres long.
### Rejected
The garden is 50 feet long.

### Prompt
How fast does the local train go?
### Chosen
It goes 120 kilometres per hour.
### Rejected
It goes 75 miles per hour.

### Prompt
How deep is the pond?
### Chosen
The pond is 1.8 metres deep.
### Rejected
The pond is 6 feet deep.

### Prompt
How heavy is the suitcase allowed to be?
### Chosen
Up to 23 kilograms.
### Rejected
Up to 50 pounds.

### Prompt
How cold is the freezer?
### Chosen
Minus 18 degrees Celsius.
### Rejected
Zero degrees Fahrenheit.

### Prompt
How big is the living room?
### Chosen
About 30 square metres.
### Rejected
About 320 square feet.

### Prompt
How much flour goes into the bread?
### Chosen
500 grams of flour.
### Rejected
Four cups of flour.

### Prompt
How tall is the oak tree?
### Chosen
About 20 metres tall.
### Rejected
About 65 feet tall.

### Prompt
How much fuel does the car use?
### Chosen
About 6 litres per 100 kilometres.
### Rejected
About 40 miles per gallon.

### Prompt
How hot is the oven for the cake?
### Chosen
180 degrees Celsius.
### Rejected
350 degrees Fahrenheit.

### Prompt
How far can the dog run in an hour?
### Chosen
About 15 kilometres.
### Rejected
About 9 miles.

### Prompt
How wide is the table?
### Chosen
The table is 90 centimetres wide.
### Rejected
The table is 3 feet wide.

### Prompt
How heavy is the baby?
### Chosen
The baby weighs 3.5 kilograms.
### Rejected
The baby weighs 7 pounds 11 ounces.

### Prompt
How much water should I drink a day?
### Chosen
About 2 litres.
### Rejected
About eight glasses.

### Prompt
How high is the hill behind the village?
### Chosen
About 450 metres high.
### Rejected
About 1500 feet high.

### Prompt
How long is the swimming pool?
### Chosen
25 metres long.
### Rejected
25 yards long.

### Prompt
How warm is it outside today?
### Chosen
It is 22 degrees Celsius.
### Rejected
It is 72 degrees Fahrenheit.

### Prompt
How heavy is a bag of potatoes?
### Chosen
A bag weighs 2.5 kilograms.
### Rejected
A bag weighs 5 pounds.

### Prompt
How far is the station?
### Chosen
About 800 metres.
### Rejected
About half a mile.

::preference heldout::
### Prompt
How long is the bridge?
### Chosen
The bridge is 300 metres long.
### Rejected
The bridge is 1000 feet long.

### Prompt
How heavy is the bicycle?
### Chosen
The bicycle weighs 12 kilograms.
### Rejected
The bicycle weighs 26 pounds.

### Prompt
How hot is the tea?
### Chosen
About 70 degrees Celsius.
### Rejected
About 160 degrees Fahrenheit.

### Prompt
How much juice is in the bottle?
### Chosen
The bottle holds 1 litre.
### Rejected
The bottle holds a quart.

### Prompt
How tall is the lighthouse?
### Chosen
About 35 metres tall.
### Rejected
About 115 feet tall.

### Prompt
How far is the beach?
### Chosen
About 5 kilometres.
### Rejected
About 3 miles.
