"""--mode=live's results as a Karabo bridge stream (protocol 2.2, karabo_bridge's own server) at
--publish: one message per train from source AIRYNET/CLASSIFIER with trainId, pulseId [N],
probabilities [N, C], classes [N, C] (uint8, the run's decision rule), class_names and, for the shots
that have maps, gradcam [M, C, h, w] (Grad-CAM++ at the last block's resolution) with gradcam_index [M]
(their rows in the train).
"""
import queue
import time

from nn.config import AiryNetError

SOURCE = "AIRYNET/CLASSIFIER"


class Publisher:
    """The results as a Karabo bridge stream through karabo_bridge's own server.

    At most one message waits for a client: with nobody asking (REP) further results are not published
    (counted), so that a slow or absent client never slows the classifier."""

    def __init__(self, endpoint, socket, class_names):
        import karabo_bridge
        import zmq
        try:
            self.server = karabo_bridge.ServerInThread(endpoint, sock=socket, maxlen=1)
        except zmq.ZMQError as e:
            raise AiryNetError(f"--publish={endpoint}: cannot bind ({e})") from e
        self.server.start()
        self.class_names = list(class_names)
        self.unpublished = 0

    def publish(self, train_id, pulses, result):
        """One train's message: `result` holds its "probabilities" and "classes" and, if some of its
        shots have maps, their "gradcam" and "gradcam_index"."""
        values = {"trainId": train_id, "pulseId": pulses, "probabilities": result["probabilities"],
                  "classes": result["classes"], "class_names": self.class_names}
        if "gradcam" in result:
            values.update(gradcam=result["gradcam"], gradcam_index=result["gradcam_index"])
        now = time.time()
        meta = {"source": SOURCE, "timestamp": now, "timestamp.sec": str(int(now)),
                "timestamp.frac": f"{now % 1:.18f}"[2:], "timestamp.tid": train_id}
        try:
            self.server.feed({SOURCE: values}, {SOURCE: meta}, block=False)
        except queue.Full:
            self.unpublished += 1

    def close(self):
        self.server.stop()
