---
# corpus-dora.dlm: the Lake Orvane corpus trained with dora. Its twin differs only in training.adapter.
# Train both and judge: dlm compare configs/corpus-lora.dlm configs/corpus-dora.dlm --gate
dlm_id: 01KAV3JB4Q5R6S7T8V9W0X1Y2Z   # each twin has its own id, so its own store
dlm_version: 1
base_model: smollm2-135m          # embedded SmolLM2-135M-Instruct (135M params, 30 layers, hidden 576)
system_prompt: You answer questions about the Lake Orvane ferries in one sentence.
training:
  adapter: dora               # the only key that differs between the twins
  lora_r: 8                 # low rank: where DoRA is said to help most
  lora_alpha: 16            # scale = 16 / 8 = 2
  lora_dropout: 0.0         # 0 keeps DoRA on PEFT's fast path (base output reused)
  target_modules: auto      # q_proj, k_proj, v_proj, o_proj
  learning_rate: 2.0e-4
  num_epochs: 7             # 21 training rows / effective batch 8 = 3 steps an epoch -> 21 steps
  sequence_len: 256         # the longest row is ~110 tokens
  eval_fraction: 0.15       # unused here: the pinned `heldout` section below is the held-out set (32 Q/A)
  seed: 42                  # same seed in both twins: same data order (the split never depends on it)
---
# The ferries of Lake Orvane

## History

The ferry service on Lake Orvane began in 1871, when the boatwright Mirela Tosk launched the *Heron*, a
twelve-seat steam launch that crossed from Calden to the island village of Pell twice a day.

By 1902 the Orvane Ferry Company ran six boats and had moved its yard to Brask, on the lake's northern
shore, where the water stays deep enough in late summer for the larger hulls.

## The fleet

The company names every boat after a bird. The oldest boat still sailing is the *Grebe*, built in 1938,
which carries forty passengers and no vehicles.

The largest is the *Osprey*, launched in 1994: it carries twelve cars and two hundred passengers and is
the only boat allowed on the winter crossing to Pell.

## Timetable

In summer, boats leave Calden on the hour from seven in the morning to nine at night. In winter the
service drops to four crossings a day, and none run when the lake freezes past the Pell breakwater.

A crossing from Calden to Pell takes thirty-five minutes; the longer run from Calden to Brask takes an
hour and ten minutes and stops at Pell on request.

## Tickets

A single adult ticket costs four orvs; children under twelve travel free with an adult. Cars pay
eighteen orvs each way, and bicycles ride free on every boat except the *Grebe*, which has no deck space
for them.

## Traditions

On the first Sunday of June the whole fleet sails together to Pell for the Lantern Crossing, when
passengers float paper lanterns from the stern. The custom started in 1921 to honour the crew of the
*Kestrel*, which sank in a storm that spring with no loss of life.

::instruction::
### Q
Who started the ferry service on Lake Orvane?
### A
The boatwright Mirela Tosk, in 1871, with a steam launch called the *Heron*.

### Q
Where is the Orvane Ferry Company's yard?
### A
At Brask, on the northern shore, where the water stays deep in late summer.

### Q
How are the boats named?
### A
Every boat is named after a bird.

### Q
Which is the oldest boat still sailing?
### A
The *Grebe*, built in 1938; it carries forty passengers and no vehicles.

### Q
Which boat makes the winter crossing to Pell?
### A
Only the *Osprey*, the largest boat, launched in 1994.

### Q
How long does the crossing from Calden to Pell take?
### A
Thirty-five minutes.

### Q
How long is the run from Calden to Brask?
### A
An hour and ten minutes, stopping at Pell on request.

### Q
What does an adult ticket cost?
### A
Four orvs for a single crossing; children under twelve travel free with an adult.

### Q
How much does a car pay?
### A
Eighteen orvs each way.

### Q
Can I bring a bicycle?
### A
Yes, free on every boat except the *Grebe*, which has no deck space for bicycles.

### Q
What is the Lantern Crossing?
### A
On the first Sunday of June the whole fleet sails to Pell and passengers float paper lanterns from the stern.

### Q
Why did the Lantern Crossing start?
### A
In 1921, to honour the crew of the *Kestrel*, which sank in a spring storm with no loss of life.

### Q
How often do boats leave Calden in summer?
### A
On the hour, from seven in the morning to nine at night.

### Q
What happens to the service in winter?
### A
It drops to four crossings a day and stops when the lake freezes past the Pell breakwater.

### Q
How many cars does the *Osprey* carry?
### A
Twelve cars and two hundred passengers.

### Q
How many boats did the company run in 1902?
### A
Six boats.

::instruction heldout::
### Q
In what year did ferries start running on Lake Orvane?
### A
In 1871.

### Q
What was the name of the first ferry on the lake?
### A
The *Heron*, a twelve-seat steam launch.

### Q
How many seats did the *Heron* have?
### A
Twelve seats.

### Q
Between which places did the *Heron* first cross?
### A
From Calden to the island village of Pell.

### Q
How many times a day did the *Heron* cross at first?
### A
Twice a day.

### Q
Who built the *Heron*?
### A
The boatwright Mirela Tosk.

### Q
How many boats did the Orvane Ferry Company have by 1902?
### A
Six boats.

### Q
Why did the company move its yard to Brask?
### A
Because the water there stays deep enough in late summer for the larger hulls.

### Q
On which shore of the lake is Brask?
### A
On the northern shore.

### Q
What are the company's boats named after?
### A
Birds.

### Q
When was the *Grebe* built?
### A
In 1938.

### Q
How many passengers does the *Grebe* carry?
### A
Forty passengers, and no vehicles.

### Q
Can the *Grebe* carry cars?
### A
No, the *Grebe* carries no vehicles.

### Q
Which is the largest boat in the fleet?
### A
The *Osprey*, launched in 1994.

### Q
When was the *Osprey* launched?
### A
In 1994.

### Q
How many passengers does the *Osprey* carry?
### A
Two hundred passengers and twelve cars.

### Q
What is the first summer departure from Calden?
### A
Seven in the morning.

### Q
What is the last summer departure from Calden?
### A
Nine at night.

### Q
How many crossings a day run in winter?
### A
Four crossings a day.

### Q
When does the winter service stop?
### A
When the lake freezes past the Pell breakwater.

### Q
How long does it take to get from Calden to Brask?
### A
An hour and ten minutes.

### Q
Does the Brask boat stop at Pell?
### A
Yes, on request.

### Q
What does a child under twelve pay?
### A
Nothing, when travelling with an adult.

### Q
What is the fare for a car?
### A
Eighteen orvs each way.

### Q
On which boat are bicycles not allowed?
### A
The *Grebe*, which has no deck space for them.

### Q
What do bicycles pay on the ferries?
### A
Nothing; they ride free on every boat except the *Grebe*.

### Q
When is the Lantern Crossing held?
### A
On the first Sunday of June.

### Q
Where does the fleet sail for the Lantern Crossing?
### A
To Pell.

### Q
What do passengers do during the Lantern Crossing?
### A
They float paper lanterns from the stern.

### Q
In what year did the Lantern Crossing begin?
### A
In 1921.

### Q
Which boat sank in the storm of 1921?
### A
The *Kestrel*.

### Q
Was anyone lost when the *Kestrel* sank?
### A
No, there was no loss of life.
