"""Ray actors, one file per role. Classes are plain; `ray.remote` wraps them at placement."""
