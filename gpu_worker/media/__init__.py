"""Media engines: image and video generation (diffusers) run as rq jobs, speech
(Kokoro) through the fair queue; ``jobs`` consumes the rq queues in-process."""
