"""Feature-map statistics: gathered in one pass, stored with a fingerprint of what they came from."""
