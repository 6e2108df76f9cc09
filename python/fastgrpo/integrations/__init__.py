"""Drop-ins for trainers. Importing this package imports no trainer and patches nothing: each module's
functions are called explicitly, and only a function whose name says so (``register_*``) touches a trainer."""
