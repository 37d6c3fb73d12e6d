"""Generator pod: an arq worker that runs the model and publishes tokens to Redis Streams."""
