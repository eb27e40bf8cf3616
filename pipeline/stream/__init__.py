"""The stream path: a Kafka consumer-group member that tags records as they
arrive (``mmpipe stream``).  :mod:`.stages` holds the small Kafka-free
stages, :mod:`.consumer` wires them to kafka-python, :mod:`.client` turns
the ``stream:`` settings into client arguments."""
