"""The built-in offline corpus: a deterministic generator of short children's stories.

TinyStories (Eldan & Li, 2023) showed that a tiny model learns fluent English from simple stories.
We cannot download it here, so we write our own in the same spirit: a cast with names and
pronouns that agree, a place, an object, a small problem, dialogue in quotes, a resolution and
sometimes a moral. Every story is a pure function of (seed, index), so the corpus is reproducible
byte for byte.

    from babyllama.stories import generate_stories
    stories = generate_stories(1000, seed=0)          # list[str], no duplicates

    babyllama corpus --n 1000 --seed 0 --out out/stories.jsonl

    from babyllama.stories import generate_requests
    (req, story), = generate_requests(1, seed=0)      # req.text: "Tell me a story about ..."
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# word lists: the more there are, the more words the model sees (the corpus has > 1,500 words)

BOYS = """Tom Ben Max Sam Leo Jack Tim Finn Noah Oscar Theo Hugo Milo Luke Adam Eli Owen Jake Ryan
Dan Liam Ethan Alex Henry Louis Felix Jasper Arthur Oliver Charlie Toby Harry Ollie Zack
Peter Paul Simon Mark Kevin Bobby Danny Eddie Freddie Georgie Johnny Joey Kyle Lenny
Mike Ned Ricky Sid Teddy Vince Walter Billy Andy Benny Aaron Brian Carl Dexter Edgar
Frank Gus Ivan Jonah Kai Leon Marco Nathan Otis Percy Quentin Rex Stan Tony Victor
Wesley Xavier Yuri Zane Bruno Cyrus Dean Elliot Gabe Hank
Abel Boris Caleb Dylan Emil Fabian Gideon Harvey Isaac Jesse Kenny Lucas Morris Nico Omar
Pablo Reggie Silas Tobias Ulysses Vernon Wyatt Archie Basil Clement Damon Ezra Ferdinand
Gilbert Horace""".split()
GIRLS = """Lily Sue Mia Anna Emma Lucy Sara Zoe Amy Ella Rose Ruby Grace Chloe Daisy Ivy Molly
Nora Holly Jane Kate Lena Maya Nina Olive Polly Rosie Tess Wendy Clara Bella Hannah
Alice Julia Sophie Sally Jenny Penny Megan Fiona Gina Heidi Iris Janet Kitty Laura
Mandy Nell Pam Rita Tina Vera Willa Betty Cathy Dora Elsie Flora Abby Bridget Carmen
Delia Edith Freya Greta Hazel Ingrid Josie Kara Luna Mabel Nadia Opal Pearl Quinn Rhea
Stella Tilly Uma Violet Winnie Yara Zelda Ada Bea Cora Dina Eva
Agnes Beatrix Celia Daphne Esme Fern Gemma Harriet Imogen Juniper Keira Lottie Marigold
Nellie Ophelia Petra Rosalind Sadie Thea Una Viola Wren Annie Blossom Cleo Dottie Elodie
Florence Gwen Hattie""".split()

# (animal, is it small enough to hold)
ANIMALS = """cat dog bunny bird duck frog fox bear mouse owl pig cow horse lamb goat puppy kitten
turtle squirrel deer hedgehog raccoon chick hen rooster donkey pony tiger lion
elephant monkey giraffe zebra hippo panda koala penguin seal whale dolphin fish crab
snail ladybug butterfly bee ant beaver otter wolf mole badger robin sparrow parrot
swan goose llama camel kangaroo dragon unicorn flamingo peacock pelican walrus
octopus jellyfish starfish seahorse chipmunk gerbil hamster lizard toad caterpillar
moth firefly grasshopper porcupine skunk moose bat beetle cricket dove eagle falcon
gorilla hummingbird iguana jaguar koi lobster meerkat newt ostrich
alpaca armadillo bison buffalo cheetah chimpanzee crane crocodile ferret heron hyena lemur
lynx manatee mongoose narwhal orangutan panther platypus puffin quail reindeer rhino
salamander sloth stork tapir toucan vulture weasel wombat yak""".split()
PEOPLE = """girl boy kid child farmer baker painter sailor builder teacher doctor princess prince
king queen knight pirate fairy wizard giant clown chef""".split()
GIRL_ONLY = {"girl", "princess", "queen", "fairy"}
BOY_ONLY = {"boy", "prince", "king", "wizard"}

ADJECTIVES = """little big happy kind brave shy silly curious gentle friendly clever funny tiny
sleepy busy proud quiet loud smart sweet cheerful careful playful lazy grumpy
lucky polite helpful honest fast slow strong young old fluffy cozy bright wise
eager jolly calm bold nice good tidy messy soft warm cold dizzy fearless generous
graceful hopeful humble jumpy merry nosy patient picky plucky rosy shiny snuggly
speedy spunky thoughtful tiny wobbly zany chubby fuzzy giggly hungry naughty noisy
peaceful
adventurous bashful chatty daring dreamy fussy gallant loyal mischievous nimble puzzled
quirky restless sensible sprightly stubborn timid trusty witty zealous cuddly dainty feisty
jovial""".split()
OBJ_ADJ = """red blue green yellow purple pink orange white black brown golden silver shiny
sparkly round soft fuzzy smooth bumpy striped spotted tiny huge heavy light old new
pretty special magic wooden plastic glass paper velvet woolly crooked enormous
glittery dusty muddy squeaky bouncy twinkly
glossy fluorescent tattered knitted lacy painted carved polished speckled""".split()
OBJECTS = """ball kite hat balloon book box toy car doll drum bell ring key cup spoon shell stone
feather flower leaf rock stick boat train truck crayon pencil brush bucket basket
blanket pillow sock shoe boot scarf mitten button coin jar bottle lamp map whistle
puzzle block robot teddy bear necklace bracelet crown wand star sticker marble yo-yo
kazoo flute guitar piano umbrella bag backpack rope ladder wagon bike sled shovel
compass telescope lantern trumpet harmonica tambourine rattle pinwheel ribbon locket
acorn pinecone pebble seashell rocket spaceship airplane helicopter tractor bulldozer
scooter skateboard paintbrush notebook envelope postcard photograph mirror clock
watch candle cushion quilt sweater jacket raincoat slipper hammer bottlecap magnet
binoculars hourglass kaleidoscope accordion xylophone banjo trophy medal globe
snowglobe teapot saucer ladle thimble yarn spool pinata
harp kettle lunchbox parasol sieve tiara trowel whisk abacus bugle cymbal flashlight goblet
hairbrush keychain marionette megaphone ocarina periscope pitchfork ukulele windchime
trinket satchel dreidel""".split()
FOODS = """apple banana cookie cake pie bread cheese carrot grape pear plum cherry berry sandwich
muffin cupcake pancake soup honey candy lollipop orange peach melon strawberry pizza
cracker pretzel popcorn noodle egg waffle biscuit dumpling taco burrito omelet yogurt
watermelon pineapple coconut mango kiwi lemon lime raisin walnut peanut almond oatmeal
porridge jelly donut bagel tomato cucumber potato corn broccoli spinach pudding custard
gingerbread marshmallow toffee fudge scone brownie
apricot avocado cabbage caramel crumpet eclair fig lasagna meatball nectarine nougat papaya
parsnip quesadilla radish rhubarb sherbet smoothie tangerine turnip zucchini cantaloupe
blueberry""".split()
PLACES = """park forest garden beach farm lake river meadow hill town village pond field
playground school library zoo market castle jungle cave island mountain valley orchard
barn kitchen backyard street bakery museum circus harbor lighthouse desert swamp
greenhouse attic treehouse igloo tent cottage palace windmill carnival aquarium stable
pumpkin-patch
bayou canyon glacier marsh prairie quarry reef savanna vineyard""".split()
PLACE_ADJ = """quiet sunny green busy small big old cozy peaceful windy shady snowy sleepy
bustling colorful faraway magical misty""".split()
SPOTS = """tree bush rock fence bench log flowerbed wall gate stump hedge shed bridge tower
wheelbarrow haystack signpost mailbox scarecrow fountain""".split()
FAMILY_F = ["mom", "grandma", "aunt", "big sister"]
FAMILY_M = ["dad", "grandpa", "uncle", "big brother"]
ACTIVITIES = """play outside|run in the grass|sing songs|draw pictures|build towers|read
books|dance in the sun|splash in puddles|climb trees|pick flowers|look at the
clouds|play hide and seek|ride a bike|fly a kite|bake cookies|jump rope|count the
stars|catch bugs|paint with bright colors|make sand castles|play the drum|swim in
the lake|watch the birds|play tag|roll down the hill|collect shells|plant
seeds|tell jokes|play with blocks|chase butterflies|juggle oranges|whistle
tunes|feed the ducks|knit scarves|hop like a frog|stack pebbles|blow bubbles|skip
stones|solve riddles|make mud pies|gather acorns|sweep the porch|water the
plants|play hopscotch|write letters|play marbles|watch the sunset""".replace(
    "\n", " ").split("|")
FEELINGS_GOOD = """happy glad proud excited thankful cheerful joyful calm relieved delighted
grateful overjoyed content thrilled""".split()
FEELINGS_BAD = """sad worried scared upset lonely grumpy confused nervous frustrated gloomy
miserable anxious heartbroken disappointed""".split()
TIMES = ["morning", "afternoon", "evening", "day", "sunny morning", "rainy day", "windy day",
         "cold morning", "warm afternoon", "snowy day", "summer day", "spring morning"]
ADVERBS = """quickly slowly happily carefully gently quietly loudly softly bravely proudly eagerly
calmly kindly sadly suddenly bravely cheerfully cautiously clumsily curiously
gracefully hopefully joyfully nervously patiently politely shyly sleepily swiftly
thoughtfully wearily boldly merrily""".split()
SOUNDS = ["a loud bang", "a soft cry", "a funny noise", "a little squeak", "a big splash",
          "a tiny voice", "a sad sniff", "a strange buzz"]
FEATURES = ["long floppy ears", "a bushy tail", "bright green eyes", "curly red hair",
            "freckles on the nose", "a squeaky laugh", "a striped scarf", "big round glasses",
            "tiny pointy teeth", "soft spotted fur", "a crooked smile", "shiny black boots",
            "a purple backpack", "wiggly whiskers", "a feathered cap", "muddy knees",
            "a gentle voice", "strong legs for jumping", "a sparkly bow", "wings of many colors"]
MORALS = ["friends help each other", "it is good to share", "being kind makes everyone happy",
          "it is okay to ask for help", "being brave is not the same as never being scared",
          "telling the truth is always best", "patience brings good things",
          "working together makes hard things easy", "it is important to be careful",
          "saying sorry can fix a lot", "everyone is good at something",
          "a good friend listens", "trying again is how we learn"]

SCENES = """The sun was warm and the sky was blue.|Bees buzzed around the sunflowers.|The wind
whispered through the tall grass.|Little waves splashed against the sandy shore.|Birds
chirped in the branches above.|Fresh snow covered the rooftops like a white
blanket.|The leaves were turning orange, red and gold.|A gentle breeze carried the
smell of roses.|Fireflies blinked in the twilight.|The morning dew sparkled on every
petal.|Puffy clouds drifted across the sky.|Frogs croaked near the muddy bank.|The old
clock on the wall went tick, tock.|Raindrops tapped on the window.|A rainbow stretched
over the hills.|The crickets sang their evening song.|Pumpkins grew fat and round in
the patch.|Icicles hung from the branches.|The tulips and daisies swayed in the
breeze.|Smoke curled up from the chimney.|Ducks paddled across the calm water.|The
grass was soft and green.|Thunder rumbled far away.|Moonlight shone on the quiet
meadow.|Squirrels gathered acorns for the winter.|The market was noisy and
crowded.|Waterfalls tumbled over mossy stones.|Seagulls squawked above the
harbor.|Tall pine trees stood like giants.|The bakery smelled of warm bread and
cinnamon.|Lanterns glowed along the path.|Butterflies fluttered over the clover.|A
woodpecker knocked on an oak tree.|The pebbles in the stream were smooth and
shiny.|Mushrooms popped up after the storm.|Berries grew thick on the bramble
bushes.|Dragonflies zipped over the reeds.|The library was hushed and full of dusty
books.|Colorful kites danced high above the beach.|A parade marched down the street
with drums and trumpets.|Cherry blossoms fell like pink snow.|The carnival lights
twinkled and the music played.|Cows mooed in the barn and the chickens
clucked.|Sunflowers turned their faces to the sun.|The fog was thick and gray.|Wild
strawberries hid under the leaves.|The ice on the pond creaked and groaned.|Hot cocoa
steamed in big mugs.|Lightning flickered behind the distant
mountains.|Goldfinches nibbled thistle seeds by the gate.|Pinecones crunched underfoot on the
trail.|The orchard smelled of ripe plums and apricots.|A lighthouse beam swept across the
choppy sea.|Violets and buttercups dotted the hillside.|Woodsmoke drifted over the frosty
village.|A hummingbird hovered beside the honeysuckle.|Tadpoles wriggled in the shallow
puddle.|Snowflakes twirled past the lamplight.""".replace("\n", " ").split("|")
DREAMS = """fly like a bird|sail across the ocean|visit the moon|become a famous singer|build a
giant castle|find a hidden treasure|ride a real dragon|swim with the dolphins|grow the
biggest pumpkin|climb the highest mountain|paint a beautiful mural|explore a deep
cave|win a shiny medal|bake the tallest cake|travel to a faraway land|learn to
juggle|write a magical poem|play the violin on a stage|discover a new planet|make a
rocket from cardboard|dig a tunnel to the other side|count every star in the
sky|invent a flying bicycle|speak with whales|open a toy shop|become a brave
firefighter|run faster than the wind""".replace("\n", " ").split("|")


@dataclass(frozen=True)
class Character:
    name: str
    kind: str          # "cat", "girl", ...
    female: bool

    def pronouns(self, key: str) -> dict[str, str]:
        """Template fields for this character: {N}, {P} he/she, {Po} him/her, {Pp} his/her."""
        p, po, pp = ("she", "her", "her") if self.female else ("he", "him", "his")
        return {key: self.name, key + "P": p, key + "Pc": p.capitalize(), key + "Po": po,
                key + "Pp": pp, key + "Ppc": pp.capitalize(), key + "K": self.kind}


def _character(rng: random.Random, avoid: set[str]) -> Character:
    female = rng.random() < 0.5
    while True:
        name = rng.choice(GIRLS if female else BOYS)
        if name not in avoid:
            break
    pool = PEOPLE if rng.random() < 0.4 else ANIMALS
    kind = rng.choice(pool)
    if (female and kind in BOY_ONLY) or (not female and kind in GIRL_ONLY):
        kind = "girl" if female else "boy"
    return Character(name, kind, female)


def _an(word: str) -> str:
    vowel = word[0] in "aeiou" and not word.startswith(("uni", "use", "uku"))
    vowel = vowel or word.startswith(("honest", "hour"))
    return ("an " if vowel else "a ") + word


# ----------------------------------------------------------------------------------------------
# story parts. A template uses {A*} for the hero and {B*} for the friend; a sentence that names
# only one of them uses only that one's pronouns (tests check this).

INTROS = [
    "Once upon a time, there was {adj_a} {AK} named {A}.",
    "Once upon a time, in a {padj} {place}, there lived {adj_a} {AK} called {A}.",
    "There was once {adj_a} {AK} named {A} who loved to {act}.",
    "One {time}, {adj_a} {AK} named {A} woke up early.",
    "{A} was {adj_a} {AK}. {APc} lived near a {padj} {place}.",
    "In a small {place} far away, there lived {adj_a} {AK}. {APpc} name was {A}.",
]
SETTINGS = [
    "{scene}",
    "{APc} dreamed that one day {AP} would {dream}.",
    "Every day, {AP} liked to {act} with {APp} {fam}.",
    "{A} loved to {act} more than anything.",
    "{APc} often went to the {place} to {act}.",
    "{A} had a favorite {obj} that was {oadj}.",
    "All the animals in the {place} knew {A}, because {AP} always smiled.",
]
FINDS = [
    "One day, {A} found {oadj_a} {obj} under a {spot}.",
    "One {time}, {A} saw {oadj_a} {obj} next to the {spot}.",
    "While {AP} was walking in the {place}, {A} found {oadj_a} {obj}.",
    "On the way to the {place}, {A} spotted {oadj_a} {obj} by a {spot}.",
]
MEETS = [
    "Then {A} met {adj_b} {BK} named {B}. {B} had {feature}.",
    "Then {A} met {B}, {adj_b} {BK} with {feature}.",
    "Soon, {adj_b} {BK} called {B} came by.",
    "Just then, {A} heard {sound}. It was {B}, {adj_b} {BK}.",
    "Near the {spot}, {A} saw {B}, {adj_b} {BK} from the {place2}.",
]

# Each problem: (setup lines, what the hero says, how the friend helps, ending line)
PROBLEMS = [
    (["{B} looked {bad}.", "\"What is wrong, {B}?\" asked {A}.",
      "\"I lost my {obj2},\" said {B}. \"I looked everywhere, but I can not find it.\""],
     ["\"Do not worry,\" said {A}. \"I will help you look.\""],
     ["{A} and {B} looked behind the {spot} and under the {spot2}.",
      "At last, {A} saw something {oadj2} in the grass. It was the {obj2}!"],
     ["{B} was so {good}. \"Thank you, {A}!\" {BP} said, and {BP} gave {A} a big hug."]),
    (["The {obj} flew up and got stuck in a tall tree.",
      "{A} jumped and jumped, but {AP} could not reach it. {APc} felt {bad}."],
     ["\"Can you help me?\" asked {A}. \"My {obj} is stuck.\""],
     ["{B} thought for a moment. \"I have an idea!\" said {B}.",
      "{BPc} found a long stick and pushed the {obj} down {adv}."],
     ["{A} caught the {obj}. \"You are a good friend,\" said {A}.",
      "The two friends played with the {obj} until the sun went down."]),
    (["{B} wanted to play with the {obj} too.",
      "But {A} did not want to share. \"It is mine,\" said {A}.",
      "{B} felt {bad} and walked away {adv}."],
     ["{A} sat alone with the {obj}. It was not much fun to play alone.",
      "{A} ran after {B}. \"I am sorry,\" said {A}. \"Do you want to play with me?\""],
     ["\"Yes, please!\" said {B}. They took turns with the {obj}, and they laughed and laughed."],
     ["{A} learned that playing together is more fun than playing alone."]),
    (["Suddenly, dark clouds came and it started to rain.",
      "{A} was {bad}. \"Oh no! My {obj} will get wet!\" {AP} cried."],
     ["{B} had a big umbrella. \"Come here, {A}!\" said {B}. \"We can share.\""],
     ["They stood under the umbrella and listened to the rain.",
      "Soon the sun came out and a rainbow filled the sky."],
     ["\"Look, a rainbow!\" said {A}. {APc} felt {good} and warm inside."]),
    (["{B} was hungry, but {BPp} basket was empty.",
      "\"I have no food,\" said {B}, and {BP} looked {bad}."],
     ["{A} had {food_a} in {APp} bag. \"You can have half of my {food},\" said {A}."],
     ["{A} broke the {food} in two pieces and gave one to {B}.",
      "They sat by the {spot} and ate together. The {food} was very yummy."],
     ["\"Thank you for sharing,\" said {B}. {A} smiled. Sharing made {APo} feel {good}."]),
    (["The {obj} fell on the ground and broke into pieces.",
      "{A} started to cry. \"My {obj} is broken!\" {AP} said."],
     ["{B} came over {adv}. \"Let me see,\" said {B}. \"Maybe we can fix it.\""],
     ["{B} found some glue, and the two friends worked together.",
      "Piece by piece, they put the {obj} back together."],
     ["\"It is as good as new!\" said {A}. {APc} gave {B} a big smile."]),
    (["When night came, the {place} got very dark.",
      "{A} was scared of the dark. \"I want to go home,\" {AP} said."],
     ["{B} held {A}'s hand. \"Look up, {A},\" said {B}. \"The stars are out.\""],
     ["{A} looked up and saw the moon and many bright stars.",
      "With {B} right there, the dark did not feel so scary."],
     ["{A} was not scared anymore. {APc} felt brave and {good}."]),
    (["{A} wanted to win the race at the {place}.",
      "{APc} ran very fast, but then {AP} tripped and fell down."],
     ["{B} stopped running and came back. \"Are you okay, {A}?\" asked {B}."],
     ["{B} helped {A} get up, and they walked to the end together."],
     ["They did not win, but {A} was {good}. \"You are the best friend,\" said {A}."]),
    (["A strong wind blew the {obj} into the {pond}.",
      "{A} gasped. \"I can not swim,\" {AP} whispered, and {APp} lip trembled."],
     ["{A} called for help. \"Please, can anyone help me?\""],
     ["{B} waded into the cold water, reached out and grabbed the {obj}.",
      "{BPc} carried it back, dripping and shivering, but smiling."],
     ["{A} wrapped {B} in a warm towel. \"You are my hero,\" said {A}."]),
    (["{A} and {B} wanted to build a fort, but they did not agree on how.",
      "\"It should be tall!\" said {A}. \"No, it should be wide!\" said {B}.",
      "They argued and the fort fell down with a crash."],
     ["{A} took a deep breath. \"What if we make it tall and wide?\" asked {A}."],
     ["So they used branches, blankets and cardboard boxes, and they worked side by side.",
      "Soon they had the most wonderful fort in the whole {place}."],
     ["They sat inside, ate {food} and told stories until it was time for supper."]),
    (["{A} wanted to bake a surprise for {APp} {fam}, but {AP} did not know how.",
      "Flour flew everywhere, and the dough was sticky and lumpy."],
     ["{A} sighed. \"Baking is hard,\" {AP} said. \"Maybe I should give up.\""],
     ["{B} came into the kitchen. \"Let us read the recipe together,\" said {B}.",
      "They measured the sugar, cracked the eggs, stirred the batter and waited by the oven."],
     ["The cake came out golden and delicious. Everyone cheered and asked for seconds."]),
    (["A little kitten was stuck on the roof of the {spot} and meowed loudly.",
      "{A} was {bad}. {APc} did not know what to do."],
     ["\"We need a ladder,\" said {A}. \"Let us ask for help.\""],
     ["{B} ran to fetch a ladder from the shed and held it steady.",
      "{A} climbed up carefully and lifted the kitten down."],
     ["The kitten purred and licked {A}'s cheek. {A} giggled and felt {good}."]),
    (["{A} had a big show at the {place}, and {AP} had to sing in front of everyone.",
      "{APc} felt butterflies in {APp} tummy. {APc} was very nervous."],
     ["\"What if I forget the words?\" {A} asked quietly."],
     ["{B} smiled. \"Just look at me and sing like we do at home,\" said {B}.",
      "{A} took a deep breath, looked at {B} and began to sing."],
     ["The audience clapped and cheered. {A} bowed and beamed with pride."]),
    (["{A} planted a seed in a little pot, but nothing happened.",
      "Day after day, {AP} looked at the pot, and still there was only dirt."],
     ["\"Why will it not grow?\" asked {A}, feeling {bad}."],
     ["{B} explained, \"Seeds need water, sunshine and time. Be patient.\"",
      "So {A} watered the pot every morning and put it by the sunny window."],
     ["One day a tiny green sprout peeked out. Later it became a beautiful flower."]),
]
ENDINGS = [
    "From that day on, {A} and {B} were best friends.",
    "After that, {A} and {B} played together every day.",
    "That night, {A} went to bed with a big smile.",
    "When {A} got home, {AP} told {APp} {fam} all about {APp} new friend.",
    "And they lived happily ever after.",
    "{A} never forgot that {time}.",
]
# A requested story opens by restating the request, always in the same two sentences: every
# detail then sits at a fixed place right after [/INST] ("named" -> the name, "found a red" ->
# the object), which is where a small model first learns to copy from the prompt (with the
# varied INTROS and FINDS of the corpus, the book model never learns to: chapter 05, 5.6)
REQUEST_OPENING = ["Once upon a time, there was {adj_a} {AK} named {A}.",
                   "One day, {A} found {oadj_a} {obj}."]
# then one of these short plots (a request and its story fit in the book model's 256 tokens),
# each of which brings in the friend
SHORT_PLOTS = [
    ["{A} showed the {obj} to {B}, {adj_b} {BK}.", "\"It is so {oadj}!\" said {B}.",
     "They played with the {obj} until the sun went down."],
    ["{A} did not know whose {obj} it was, so {AP} asked around the {place}.",
     "At last {B}, {adj_b} {BK}, said, \"That is mine!\"",
     "{B} was so {good} that {BP} let {A} keep it."],
    ["Then the {obj} fell into the {pond}, and {A} felt {bad}.",
     "{B}, {adj_b} {BK}, pulled it out {adv}.", "\"Thank you!\" said {A}."],
    ["{A} took the {obj} to the {place} to {act}.",
     "There {AP} met {B}, {adj_b} {BK}, and they shared the {obj}."],
    ["{A} gave the {obj} to {B}, {adj_b} {BK} who looked {bad}.",
     "{B} smiled, and {A} felt {good} inside."],
    ["The wind blew the {obj} into a {spot}, and {A} could not reach it.",
     "{B}, {adj_b} {BK}, climbed up and got it back.", "\"You are a good friend,\" said {A}."],
]
# and it ends on its hero, animal and object once more
REQUEST_ENDINGS = ["From that day on, {A} the {AK} took the {obj} everywhere.",
                   "That night, the {AK} went to sleep next to the {oadj} {obj}.",
                   "{A} the {AK} kept the {obj} forever, and {AP} never forgot that {time}.",
                   "And {A} the {AK} and {APp} {obj} lived happily ever after."]
MORAL_LINES = ["{A} learned that {moral}.", "The moral of the story is: {moral}.",
               "And so {A} knew that {moral}."]


def _story(rng: random.Random, req: Request | None = None) -> tuple[str, Character, Character]:
    """One story. With a request, its hero, adjective and object are the requested ones, it opens
    with REQUEST_OPENING and is short (SHORT_PLOTS), so that request and story fit in the book
    model's context;
    without one, the rng is drawn exactly as it always was (the corpus stays the same)."""
    a = _character(rng, set()) if req is None else Character(req.name, req.animal, req.female)
    b = _character(rng, {a.name})
    obj, obj2 = rng.sample(OBJECTS, 2)
    spot, spot2 = rng.sample(SPOTS, 2)
    place, place2 = rng.sample(PLACES, 2)
    food = rng.choice(FOODS)
    fam = rng.choice(FAMILY_F + FAMILY_M)
    fields = {
        **a.pronouns("A"), **b.pronouns("B"),
        "adj_a": _an(rng.choice(ADJECTIVES)), "adj_b": _an(rng.choice(ADJECTIVES)),
        "padj": rng.choice(PLACE_ADJ), "oadj": rng.choice(OBJ_ADJ),
        "oadj_a": _an(rng.choice(OBJ_ADJ)), "oadj2": rng.choice(OBJ_ADJ),
        "obj": obj, "obj2": obj2, "spot": spot, "spot2": spot2, "place": place,
        "place2": place2, "food": food, "food_a": _an(food), "fam": fam,
        "act": rng.choice(ACTIVITIES), "time": rng.choice(TIMES), "sound": rng.choice(SOUNDS),
        "adv": rng.choice(ADVERBS), "good": rng.choice(FEELINGS_GOOD),
        "bad": rng.choice(FEELINGS_BAD), "moral": rng.choice(MORALS),
        "scene": rng.choice(SCENES), "dream": rng.choice(DREAMS),
        "feature": rng.choice(FEATURES), "pond": rng.choice(["pond", "lake", "river", "creek"]),
    }
    if req is not None:   # every detail of the request, and nothing that contradicts it
        fields.update(adj_a=_an(req.adjective), oadj_a=_an(req.obj_adj), obj=req.obj,
                      oadj=req.obj_adj)
        if obj2 == req.obj:
            fields["obj2"] = obj
    if req is not None:
        lines = [*REQUEST_OPENING, *rng.choice(SHORT_PLOTS), rng.choice(REQUEST_ENDINGS)]
        return " ".join(line.format(**fields) for line in lines), a, b
    setup, ask, helps, end = rng.choice(PROBLEMS)
    lines = [rng.choice(INTROS)]
    lines += rng.sample(SETTINGS, rng.randint(1, 3))
    lines.append(rng.choice(FINDS))
    if rng.random() < 0.5 or "{B" in setup[0] or setup[1].startswith("{AP"):   # who comes first
        lines += [rng.choice(MEETS), *setup, *ask, *helps, *end]
    else:
        lines += [*setup[:1], rng.choice(MEETS), *setup[1:], *ask, *helps, *end]
    lines.append(rng.choice(ENDINGS))
    if rng.random() < 0.4:
        lines.append(rng.choice(MORAL_LINES))
    text = " ".join(line.format(**fields) for line in lines)
    return text, a, b


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def iter_stories(seed: int = 0) -> Iterator[tuple[str, Character, Character]]:
    """Endless stream of (text, hero, friend), deterministic in `seed`, without duplicates."""
    seen: set[int] = set()
    index = 0
    while True:
        text, a, b = _story(_rng(seed, index))
        index += 1
        h = hash(text)
        if h in seen:   # a rare exact repeat: skip it (deterministically)
            continue
        seen.add(h)
        yield text, a, b


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """`n` distinct stories, a pure function of (n, seed)."""
    if n <= 0:
        raise ValueError(f"number of stories must be positive, got {n}")
    out = []
    for text, _, _ in iter_stories(seed):
        out.append(text)
        if len(out) == n:
            return out
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# requests: "Tell me a story about a shy fox named Max who finds a red kite.", each paired with a
# story that honours every detail of it (chapter 05's instruction tuning). One (name, animal,
# object) combination in HELD_OUT_EVERY is never used for training: evaluation asks for those.

REQUEST_TEMPLATES = [
    "Tell me a story about {adj_a} {animal} named {name} who finds {oadj_a} {obj}.",
    "Write a story about {name}, {adj_a} {animal} who finds {oadj_a} {obj}.",
    "Can you tell me a story about {adj_a} {animal} called {name}? {Pc} finds {oadj_a} {obj}.",
    "Please write a short story about {adj_a} {animal} named {name} and {oadj_a} {obj}.",
    "I would like a story about {name} the {adj} {animal}, who finds {oadj_a} {obj}.",
]
HELD_OUT_EVERY = 8
REQUEST_ANIMALS = [a for a in ANIMALS if a not in OBJECTS]    # "bear" is also a (teddy) object
REQUEST_OBJECTS = [o for o in OBJECTS if o not in ANIMALS]


@dataclass(frozen=True)
class Request:
    name: str
    female: bool
    adjective: str
    animal: str
    obj_adj: str
    obj: str
    text: str          # what the user types


def is_held_out(name: str, animal: str, obj: str) -> bool:
    """Whether a combination is reserved for evaluation (a fixed hash, the same on every run)."""
    return zlib.crc32(f"{name}|{animal}|{obj}".encode()) % HELD_OUT_EVERY == 0


def _request(rng: random.Random, held_out: bool) -> Request:
    while True:   # rejection: about 1 draw in 8 is held out
        female = rng.random() < 0.5
        name = rng.choice(GIRLS if female else BOYS)
        animal, obj = rng.choice(REQUEST_ANIMALS), rng.choice(REQUEST_OBJECTS)
        if is_held_out(name, animal, obj) == held_out:
            break
    adj, oadj = rng.choice(ADJECTIVES), rng.choice(OBJ_ADJ)
    text = rng.choice(REQUEST_TEMPLATES).format(
        name=name, animal=animal, obj=obj, adj=adj, adj_a=_an(adj), oadj_a=_an(oadj),
        Pc="She" if female else "He")
    return Request(name, female, adj, animal, oadj, obj, text)


def iter_requests(seed: int = 0, held_out: bool = False) -> Iterator[tuple[Request, str]]:
    """Endless (request, story) pairs, deterministic in `seed`; `held_out` picks which side of
    the split the (name, animal, object) combinations come from."""
    index = 0
    while True:
        rng = random.Random(f"request:{seed}:{int(held_out)}:{index}")   # not the story stream
        req = _request(rng, held_out)
        yield req, _story(rng, req)[0]
        index += 1


def generate_requests(n: int, seed: int = 0, held_out: bool = False
                      ) -> list[tuple[Request, str]]:
    """`n` (request, story) pairs, a pure function of (n, seed, held_out)."""
    if n <= 0:
        raise ValueError(f"number of requests must be positive, got {n}")
    return [pair for pair, _ in zip(iter_requests(seed, held_out), range(n))]


def honours(req: Request, text: str) -> dict[str, bool]:
    """Which of the request's character, animal and object a text names (whole words)."""
    def has(word: str, flags: int = 0) -> bool:
        return re.search(rf"\b{re.escape(word)}\b", text, flags) is not None

    return {"name": has(req.name), "animal": has(req.animal, re.IGNORECASE),
            "object": has(req.obj, re.IGNORECASE)}


def split(stories: list[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Train/validation split by position: every k-th story goes to validation.

    The stream has no duplicates, so the two splits are disjoint."""
    k = max(2, round(1 / val_fraction))
    train = [s for i, s in enumerate(stories) if i % k != k - 1]
    val = [s for i, s in enumerate(stories) if i % k == k - 1]
    return train, val


# ----------------------------------------------------------------------------------------------
# the on-disk format: JSON Lines, one object {"story": "..."} per line (TinyStories' key)

def write_jsonl(stories: list[str], path: str | Path) -> Path:
    """Write stories as JSON Lines, atomically (a temporary file, then a rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for s in stories:
                f.write(json.dumps({"story": s}, ensure_ascii=False) + "\n")
        tmp.replace(path)
    except OSError as e:
        raise OSError(f"cannot write stories to {path}: {e.strerror or e}") from e
    return path


def read_jsonl(path: str | Path) -> list[str]:
    """Read stories written by `write_jsonl` (or any JSON Lines file with a "story" key)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line)["story"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"story\" "
                                 f"key ({e})") from e
    return out
