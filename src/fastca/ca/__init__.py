"""CA lifecycle: creating, importing and loading CA material. Kept apart
from the signing path: nothing here runs per certificate."""
