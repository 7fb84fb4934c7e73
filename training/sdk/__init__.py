"""The local stand-in for the hosted training service, with the hosted SDK's names.

Import from here only (``from training.sdk import ServiceClient, Datum, ...``): a script written
against the hosted SDK ports by changing its imports.
"""

from training.sdk.choices import Choice
from training.sdk.deployments import (
    DeltaReferenceMismatchError,
    Deployment,
    DeploymentError,
    DeploymentManager,
    DeploymentNotFoundError,
    DeploymentNotReadyError,
    HotloadError,
)
from training.sdk.engines import Engine, vllm_available
from training.sdk.names import make_snapshot_identity
from training.sdk.registry import (
    FireworksClient,
    InvalidModelIdError,
    ModelExistsError,
    ModelRegistry,
    NotPromotableError,
    RegistryError,
    validate_output_model_id,
)
from training.sdk.sampling import DeploymentSampler, SampledCompletion, SamplingClient
from training.sdk.service_client import FiretitanServiceClient, ServiceClient
from training.sdk.snapshots import SnapshotCorruptError, SnapshotError, SnapshotMismatchError
from training.sdk.store import (
    CheckpointNotFoundError,
    CheckpointStore,
    JobNotFoundError,
    StoreError,
)
from training.sdk.tiny_model import SAMPLE_CHATS_PATH
from training.sdk.training_client import (
    CustomLossFn,
    NonFiniteWeightsError,
    TrainingClient,
    TrainingUsageError,
)
from training.sdk.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    GradAccNormalization,
    LoadStateResponse,
    MixedPrecision,
    ModelInput,
    OptimStepResponse,
    Pooling,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveSamplerResult,
    SaveStateResponse,
    SaveWeightsForSamplerResponse,
    TensorData,
    datum_from_model_input_weights,
)
from training.sdk.weight_sync import WeightSyncer

FiretitanTrainingClient = TrainingClient

__all__ = [
    "DeltaReferenceMismatchError", "Deployment", "DeploymentError", "DeploymentManager",
    "DeploymentNotFoundError", "DeploymentNotReadyError", "DeploymentSampler", "HotloadError",
    "SampleResponse", "SampledCompletion", "SampledSequence", "SamplingClient", "SamplingParams",
    "SnapshotCorruptError", "SnapshotError", "SnapshotMismatchError", "WeightSyncer",
    "AdamParams", "CheckpointNotFoundError", "CheckpointStore", "InvalidModelIdError",
    "JobNotFoundError", "ModelExistsError", "NotPromotableError", "RegistryError", "Datum", "EncodedTextChunk", "FiretitanServiceClient",
    "FiretitanTrainingClient", "FireworksClient", "ForwardBackwardOutput", "GradAccNormalization",
    "LoadStateResponse", "ModelInput", "ModelRegistry", "OptimStepResponse", "SaveSamplerResult",
    "SaveStateResponse", "SaveWeightsForSamplerResponse", "ServiceClient", "StoreError",
    "NonFiniteWeightsError", "TensorData", "TrainingClient", "TrainingUsageError",
    "datum_from_model_input_weights", "MixedPrecision", "Pooling", "Choice", "CustomLossFn",
    "SAMPLE_CHATS_PATH", "make_snapshot_identity", "Engine", "vllm_available",
    "validate_output_model_id",
]
